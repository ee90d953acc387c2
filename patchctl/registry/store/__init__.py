"""The store (plumbing): names, manifests, the folder store, the index, records, views, the Repository."""
