"""The layers of M1, one file per kind: lightning attention, softmax attention, MoE, norms."""
