"""Peer servers for the load benchmark: what a user of the seed recipe serves instead of this project
(``recipe_user``, ``litserve_server --recipe``), and the same servers around the project's model, which measure
serving overhead alone (``plain_fastapi``, ``litserve_server``)."""
