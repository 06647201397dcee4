//! Stand-in for a system's `bin/switch-to-configuration`; see
//! `nixos_ami_agent_tests::standin`.
fn main() {
    nixos_ami_agent_tests::standin::switch_main()
}
