//! Generates the shim API messages from `proto/shim/v1/shim.proto` (prost only: the shim
//! speaks length-prefixed frames, not gRPC).

fn main() -> std::io::Result<()> {
    let proto = "../../proto/shim/v1/shim.proto";
    println!("cargo:rerun-if-changed={proto}");
    prost_build::Config::new().compile_protos(&[proto], &["../../proto"])
}
