//! What the host keeps of the memory plugins made it use.
//!
//! A plugin makes the host hold buffers as large as its outputs, bodies and headers (megabytes,
//! up to the output cap). glibc's allocator serves a freed block of that size again from its own
//! heap rather than the OS: it raises its mmap threshold to the largest block freed (up to
//! 32 MiB), and it only trims the top of the heap. After a burst of large outputs the process
//! then stays at its peak while idle, which is what issue 14 saw (RSS 115 MiB → 2.6 GiB, kept).
//! Fixing the threshold at 128 KiB makes every block that large a mapping of its own, unmapped
//! when freed; smaller blocks keep the fast heap path.

use std::sync::Once;

/// Blocks from this size up are mapped and unmapped one by one.
pub const LARGE_BLOCK: usize = 128 * 1024;

/// Makes freed large blocks go back to the OS (glibc on Linux; elsewhere the allocator's own
/// policy stands). Process-wide and idempotent: [`crate::Runtime::new`] calls it.
pub fn return_large_frees_to_the_os() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only sets allocator parameters; any value is valid to pass, and a
        // refused one leaves the default in place (reported below).
        #[allow(unsafe_code)]
        unsafe {
            let size = LARGE_BLOCK as libc::c_int;
            if libc::mallopt(libc::M_MMAP_THRESHOLD, size) == 0 || libc::mallopt(libc::M_TRIM_THRESHOLD, size) == 0 {
                tracing::warn!("glibc refused the malloc thresholds: freed large buffers may stay resident");
            }
        }
    });
}
