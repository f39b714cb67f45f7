//! Redis killed, restarted, out of memory, its pub/sub connection cut.
