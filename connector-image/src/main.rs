//! `obsrv-connector`: the shared connector image's binary. Runs every built-in source kind with
//! the same entry point a custom connector uses ([`obsrv_connector::cli::main`]).

use std::process::ExitCode;

use obsrv_connector::source::Registry;

/// mimalloc rather than glibc's malloc: records are many small allocations freed on other threads,
/// where glibc spent about a quarter of the connector's CPU (and contended on its arena lock).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // mimalloc asks for transparent huge pages where the kernel allows them on request (the usual
    // `madvise` mode): 2 MiB pages added ~15 MiB of RSS (42 -> 58-70 MiB in the mariadb-cdc
    // bench) for a CPU gain lost in the noise. Memory is what a pod is sized by.
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (option, value) in glibc_malloc_options(|var| std::env::var(var).ok()) {
        // SAFETY: mallopt takes plain integers; called before any thread of ours starts.
        unsafe {
            libc::mallopt(option, value);
        }
    }
    obsrv_connector::cli::main(Registry::builtin())
}

/// The `mallopt` calls for glibc's malloc, which librdkafka allocates with (ours goes to
/// mimalloc), from its broker threads and ours. One arena rather than one per thread kept the
/// Kafka relay's peak RSS 3-5 MiB lower (59.5-60.1 vs 62.1-64.8 MiB) at no measurable CPU cost.
/// A fixed 1 MiB mmap threshold (glibc raises its own up to 32 MiB once a large block is freed)
/// gives fetch responses of up to `fetch.max.bytes` back to the system when freed instead of
/// leaving holes in the heap: 54-56 vs 59-62 MiB in paired runs. A fixed threshold also fixes
/// the trim threshold at glibc's 128 KiB, which gave the heap back and faulted it in again on
/// every batch (100k-190k page faults per 1M relayed records, 30k-50k at 8 MiB). What the
/// environment (`env`) sets, by variable or in `GLIBC_TUNABLES`, wins. Pure.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn glibc_malloc_options(env: impl Fn(&str) -> Option<String>) -> Vec<(libc::c_int, libc::c_int)> {
    let tunables = env("GLIBC_TUNABLES").unwrap_or_default();
    [
        (
            libc::M_ARENA_MAX,
            1,
            "MALLOC_ARENA_MAX",
            "glibc.malloc.arena_max",
        ),
        (
            libc::M_MMAP_THRESHOLD,
            1 << 20,
            "MALLOC_MMAP_THRESHOLD_",
            "glibc.malloc.mmap_threshold",
        ),
        (
            libc::M_TRIM_THRESHOLD,
            8 << 20,
            "MALLOC_TRIM_THRESHOLD_",
            "glibc.malloc.trim_threshold",
        ),
    ]
    .into_iter()
    .filter(|(_, _, var, tunable)| env(var).is_none() && !tunables.contains(tunable))
    .map(|(option, value, _, _)| (option, value))
    .collect()
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    #[test]
    fn malloc_options_yield_to_the_environment() {
        let env = |set: &'static [(&'static str, &'static str)]| {
            move |var: &str| {
                set.iter()
                    .find(|(k, _)| *k == var)
                    .map(|(_, v)| v.to_string())
            }
        };
        let ours = vec![
            (libc::M_ARENA_MAX, 1),
            (libc::M_MMAP_THRESHOLD, 1 << 20),
            (libc::M_TRIM_THRESHOLD, 8 << 20),
        ];
        assert_eq!(glibc_malloc_options(env(&[])), ours);
        assert_eq!(
            glibc_malloc_options(env(&[("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0")])),
            ours
        );
        assert_eq!(
            glibc_malloc_options(env(&[("MALLOC_ARENA_MAX", "4")])),
            vec![
                (libc::M_MMAP_THRESHOLD, 1 << 20),
                (libc::M_TRIM_THRESHOLD, 8 << 20)
            ]
        );
        assert_eq!(
            glibc_malloc_options(env(&[(
                "GLIBC_TUNABLES",
                "glibc.malloc.mmap_threshold=131072"
            )])),
            vec![(libc::M_ARENA_MAX, 1), (libc::M_TRIM_THRESHOLD, 8 << 20)]
        );
    }
}
