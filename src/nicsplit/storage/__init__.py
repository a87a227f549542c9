"""Storage under the journal and the images: the durable file interface,
at-rest keys, and plain or sealed block images."""
