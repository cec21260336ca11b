"""Generation: sampling, the decode engine over the backbone's inference state, and the user-facing API."""
