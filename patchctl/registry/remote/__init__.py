"""Remotes: the wire protocol, remote config, sources (HTTP, folder, hf://) and verified transfer."""
