//! The `portcullis` binary: a thin shell over [`portcullis::cli`].
// The one unsafe item is the allocator tuning below (a C call).
#![deny(unsafe_code)]

fn main() -> std::process::ExitCode {
    tune_allocator();
    portcullis::cli::main()
}

// mimalloc: the gateway allocates small, short-lived objects on every
// request (headers, futures); glibc malloc costs measurably more per request.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v3's option enum (not exported by
/// libmimalloc-sys, whose constants follow v2).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// Its v3 default, in ms: checked before setting, so that a different enum
/// layout in a future mimalloc leaves the allocator alone instead of
/// changing another option.
const V3_PURGE_DELAY_DEFAULT: std::ffi::c_long = 1000;

/// Freed memory goes back to the OS 10 ms after it is free (mimalloc v2's
/// default) instead of v3's 1 s. After a burst of connections the gateway
/// goes idle, and with 1 s the burst's peak stayed resident: 2.7 KiB per
/// parked connection in `../shared/acceptance/perf` against 1.4 KiB now. Under
/// load it costs ~0.002 `madvise` calls per request. `MIMALLOC_PURGE_DELAY`
/// in the environment still wins.
#[allow(unsafe_code)]
fn tune_allocator() {
    // SAFETY: plain reads and writes of mimalloc's option table, before any
    // other thread exists (the functions are documented as not thread-safe).
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == V3_PURGE_DELAY_DEFAULT {
            libmimalloc_sys::mi_option_set_default(MI_OPTION_PURGE_DELAY, 10);
        }
    }
}

#[cfg(test)]
mod tests {
    /// Fails when a mimalloc upgrade moves the option, so the tuning never
    /// silently stops (or touches another option).
    #[test]
    #[allow(unsafe_code)]
    fn the_purge_delay_is_ten_ms() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        super::tune_allocator();
        // SAFETY: a read of mimalloc's option table.
        let v = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(v, 10);
    }
}
