"""File formats: safetensors reading/writing, HF checkpoints and base fingerprints, canonical JSON."""
