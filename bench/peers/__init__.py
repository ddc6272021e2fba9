"""Peer servers for the load benchmark: what a user of the seed recipe would serve instead of this project."""
