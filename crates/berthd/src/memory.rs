//! Keeping berthd's heap small: glibc gives every thread that allocates under contention an
//! arena of its own and keeps freed memory in them. berthd's allocations are small and its
//! threads few, so one arena is enough, and a scavenger hands memory freed by bursts of work
//! (an image pull, removing many pods) back to the kernel, as Go's runtime does for
//! containerd.

use std::time::Duration;

/// How often the scavenger looks at the heap.
const SCAVENGE_EVERY: Duration = Duration::from_secs(2);

/// Free heap growth (bytes) since the last trim that makes the scavenger trim again.
const TRIM_THRESHOLD: usize = 1 << 20;

/// One malloc arena for the whole process. Must run before other threads start.
pub fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes an allocator parameter; called before threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Free bytes held in the heap, not returned to the kernel.
#[cfg(target_env = "gnu")]
fn free_heap_bytes() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    unsafe { libc::mallinfo2() }.fordblks
}

/// Returns free heap pages to the kernel; the free bytes left afterwards.
#[cfg(target_env = "gnu")]
fn trim() -> usize {
    // SAFETY: malloc_trim releases free memory; it is safe to call at any time.
    unsafe { libc::malloc_trim(0) };
    free_heap_bytes()
}

/// Trims the heap whenever more than [`TRIM_THRESHOLD`] bytes were freed since the last
/// trim. Runs until the task is dropped.
pub async fn scavenge() {
    #[cfg(target_env = "gnu")]
    {
        let mut baseline = free_heap_bytes();
        let mut tick = tokio::time::interval(SCAVENGE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let free = free_heap_bytes();
            if free > baseline + TRIM_THRESHOLD {
                baseline = trim();
            } else {
                // Memory taken back into use lowers the bar for the next trim.
                baseline = baseline.min(free);
            }
        }
    }
}
