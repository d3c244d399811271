//! Prints the NeoXDeployment CRD: `cargo run -p neox-operator --bin crdgen > deploy/crd.yaml`.

fn main() -> anyhow::Result<()> {
    print!("{}", neox_operator::crd_yaml()?);
    Ok(())
}
