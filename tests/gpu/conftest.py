"""GPU tests compare float32 results tightly, so Triton's float32 dots run as three TF32 products (tf32x3) here, which
is about float32's accuracy, instead of one (TF32: the mamba_ssm path then differs from a float64 recurrence by about
1e-3). IEEE mode would be as exact, but ptxas needs minutes for each autotuned configuration of mamba_ssm's backward
kernels in it. Set before any kernel compiles; a run that wants other figures sets the variable itself."""

import os

os.environ.setdefault("TRITON_F32_DEFAULT", "tf32x3")
