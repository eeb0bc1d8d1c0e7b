"""Control plane: sans-IO models of the config and the subnet map, and the tables built from them."""
