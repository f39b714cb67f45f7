//! The config file, caught half-written or replaced, never applies partly.
