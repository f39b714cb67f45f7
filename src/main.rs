//! The `portcullis` binary: a thin shell over [`portcullis::cli`].
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    portcullis::cli::main()
}

// mimalloc: the gateway allocates small, short-lived objects on every
// request (headers, futures); glibc malloc costs measurably more per request.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
