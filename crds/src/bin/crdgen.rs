//! Writes the Connector CRD: `cargo run -p obsrv-crds --bin crdgen > crds/connector.yaml`
//! (or with a path argument, to that file; `helm/.../crds/` gets the same file).
fn main() -> std::io::Result<()> {
    let yaml = obsrv_crds::crd_yaml();
    let paths: Vec<String> = std::env::args().skip(1).collect();
    if paths.is_empty() {
        print!("{yaml}");
    }
    for p in paths {
        std::fs::write(&p, &yaml)?;
        eprintln!("wrote {p}");
    }
    Ok(())
}
