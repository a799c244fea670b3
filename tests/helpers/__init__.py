"""What the tests share: tiny models, the launcher, reference oracles, server fixtures."""
