"""Multi-device sampling: runtime/ (the background process group) and split/ (how one model call is split)."""
