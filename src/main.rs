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
static GLOBAL: Mimalloc = Mimalloc;

/// The alignment every mimalloc block of at least this size already has
/// (`MI_MAX_ALIGN_SIZE`; smaller blocks are word-aligned).
const MI_MAX_ALIGN: usize = 16;

/// `plain(size)` where mimalloc's blocks are aligned enough already (align
/// <= 16 and <= size), else `aligned(size, align)`.
#[allow(unsafe_code)]
#[inline]
unsafe fn allocate(
    layout: std::alloc::Layout,
    plain: unsafe extern "C" fn(usize) -> *mut std::ffi::c_void,
    aligned: unsafe extern "C" fn(usize, usize) -> *mut std::ffi::c_void,
) -> *mut u8 {
    // SAFETY: C calls with a size and a power-of-two alignment.
    unsafe {
        if layout.align() <= MI_MAX_ALIGN && layout.align() <= layout.size() {
            plain(layout.size()).cast()
        } else {
            aligned(layout.size(), layout.align()).cast()
        }
    }
}

/// mimalloc, asked for an alignment only when a layout needs more than its
/// blocks have anyway: the `mimalloc` crate's allocator calls
/// `mi_malloc_aligned` for everything, and v3 sends every size that is not
/// a small power of two through its over-allocating path (four times per
/// proxied request, ~900 instructions). The rule is std's `System` rule.
struct Mimalloc;

#[allow(unsafe_code)]
// SAFETY: every path returns mimalloc memory of at least `layout.size()`
// bytes aligned to `layout.align()`: plain `mi_malloc` only where its blocks
// are aligned that much (align <= 16 and <= size), and all memory is freed
// by `mi_free`, which takes any mimalloc pointer.
unsafe impl std::alloc::GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the two allocation functions, told apart as `alloc` must.
        unsafe {
            allocate(
                layout,
                libmimalloc_sys::mi_malloc,
                libmimalloc_sys::mi_malloc_aligned,
            )
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as in `alloc`, zeroing.
        unsafe {
            allocate(
                layout,
                libmimalloc_sys::mi_zalloc,
                libmimalloc_sys::mi_zalloc_aligned,
            )
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from this allocator, hence from mimalloc.
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        use libmimalloc_sys as mi;
        // SAFETY: `ptr` came from this allocator; the alignment rule is
        // `alloc`'s, for the new size.
        unsafe {
            if layout.align() <= MI_MAX_ALIGN && layout.align() <= new_size {
                mi::mi_realloc(ptr.cast(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}

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
