"""TokenGate: the implementation behind addons/tokengate.py."""
