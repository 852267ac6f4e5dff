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
    // librdkafka allocates with glibc's malloc (ours goes to mimalloc), from its broker threads
    // and ours. One arena rather than one per thread kept the Kafka relay's peak RSS 3-5 MiB
    // lower (59.5-60.1 vs 62.1-64.8 MiB) at no measurable CPU cost. A fixed 1 MiB mmap threshold
    // (glibc raises its own up to 32 MiB once a large block is freed) gives fetch responses of
    // up to `fetch.max.bytes` back to the system when freed instead of leaving holes in the heap:
    // 54-56 vs 59-62 MiB in paired runs, CPU within the noise. Settings in the environment win.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (option, value, env, tunable) in [
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
    ] {
        let tuned = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains(tunable));
        if std::env::var_os(env).is_none() && !tuned {
            // SAFETY: mallopt takes plain integers; called before any thread of ours starts.
            unsafe {
                libc::mallopt(option, value);
            }
        }
    }
    obsrv_connector::cli::main(Registry::builtin())
}
