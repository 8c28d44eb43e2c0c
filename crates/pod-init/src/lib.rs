//! The init process of a pod whose containers share one PID namespace (PID mode POD).
//!
//! berth has no pause container: the runtime starts this program, which makes a new PID
//! namespace with `unshare(CLONE_NEWPID)`. A process cannot move itself into it (only its
//! children land there), so [`run`] then forks once; the child is PID 1 of the namespace,
//! reaps whatever is reparented to it and otherwise sleeps. The parent prints the child's
//! host PID and exits; containers then join `/proc/<pid>/ns/pid`. (Doing the unshare here
//! rather than between berthd's fork and exec lets berthd spawn it the cheap way, without
//! copying its own page tables.)
//!
//! It is its own small binary (`berth-pod-init`) because RunPodSandbox waits for its exec:
//! ~1 MB of program starts in a fraction of the time all of berthd takes. `berthd pod-init`
//! runs the same code when the small binary is not installed.

/// The first argument of the command line, as the runtime passes it (`<program> pod-init
/// <pod dir>`; the pod dir only makes the process recognisable in `ps`).
pub const POD_INIT_COMMAND: &str = "pod-init";

/// Makes a PID namespace, forks its PID 1 and reports that one's host PID on stdout. Call
/// it first thing in `main`, before any thread exists. Never returns.
pub fn run() -> ! {
    // SAFETY: unshare(2) only changes which PID namespace our future children get.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        eprintln!("pod-init: unshare(CLONE_NEWPID): {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    // SAFETY: we are single-threaded here (called before anything else in main), so fork is
    // safe; the child only makes async-signal-safe calls.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        eprintln!("pod-init: fork: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    if pid > 0 {
        // Parent: report the child's host pid and leave; the child is reparented to berthd
        // (a subreaper) or to the host's init.
        println!("{pid}");
        std::process::exit(0);
    }
    init_loop()
}

/// PID 1 of the pod: detach from berthd's stdio and session, then reap forever.
fn init_loop() -> ! {
    // SAFETY: plain syscalls on our own process; the path is a valid C string.
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            if null > 2 {
                libc::close(null);
            }
        }
        loop {
            let mut status = 0;
            if libc::waitpid(-1, &mut status, 0) < 0 {
                // No children: nothing is reparented to us yet. SIGCHLD is ignored by
                // default, so poll rather than pause.
                libc::sleep(1);
            }
        }
    }
}
