"""Teacher service: engines that score token ids, Ray actors around them, the pool and the client."""
