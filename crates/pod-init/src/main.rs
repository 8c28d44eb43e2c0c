//! `berth-pod-init pod-init <pod dir>`: see the library's docs.

fn main() {
    berth_pod_init::run()
}
