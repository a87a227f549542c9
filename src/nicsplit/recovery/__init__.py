"""Any-point-in-time recovery: the PIT index and bookmarks, the block index
and PIT reader, replicas and distribution, image access, restore, failover,
and retention."""
