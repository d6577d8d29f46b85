"""The procedural world the embedded model is trained on (torch-free): the prompt grammar, a deterministic
renderer at any length, and the scorer that measures how well any video shows what its prompt names."""
