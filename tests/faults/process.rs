//! The gateway's own process: SIGTERM with requests in flight, too few file descriptors.
