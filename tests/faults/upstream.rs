//! Upstreams that stop, die mid-body, refuse, or answer malformed framing.
