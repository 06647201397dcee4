//! Stand-in for `fh`; see `nixos_ami_agent_tests::standin`.
fn main() {
    nixos_ami_agent_tests::standin::fh_main()
}
