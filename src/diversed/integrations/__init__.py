"""Other engines DIVERSED plugs into (the verifiers stay defined once, in verifiers.py)."""
