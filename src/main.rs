//! The `portcullis` binary: a thin shell over [`portcullis::cli`].
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    portcullis::cli::main()
}
