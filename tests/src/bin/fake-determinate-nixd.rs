//! Stand-in for `determinate-nixd`; see `nixos_ami_agent_tests::standin`.
fn main() {
    nixos_ami_agent_tests::standin::determinate_nixd_main()
}
