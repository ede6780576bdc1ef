"""The teacher-logit cache format (v1) and nothing else: schema, shards, manifest,
leases, verification and the streaming training reader. Imports neither
`pipeline` nor `stages`. Start with `storage.cache.Cache` and
`storage.dataset.CacheDataset`; docs/architecture.md lists the stable API."""
