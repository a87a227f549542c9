"""The host: NBD front end, filter chain and datastore."""
