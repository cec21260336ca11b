"""Readers for the released files OmniMamba is built from (Mamba-2 LM directories), the released OmniMamba
checkpoint in and out (omnimamba.py), and the strict check they share with the component loaders: every tensor
the model has must come from the file, and nothing else."""
