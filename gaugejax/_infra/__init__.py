"""Floor 1, infrastructure: the training loop, run directories and their files, devices, shipped
data. It imports only the numerics core."""
