//! Whatever is found in the state directory's `state.json` (arbitrary
//! bytes, JSON of other shapes, huge numbers, deep nesting): loading it
//! never panics, a usable file is kept, anything else is set aside, and
//! the run can always write its state afterwards.

use nixos_ami_agent::state::{Previous, State, Store};
use proptest::prelude::*;

fn load(bytes: &[u8]) {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(&d.path().join("state")).unwrap();
    std::fs::write(store.path(), bytes).unwrap();
    let (state, previous) = store.load("i-1").unwrap();
    match previous {
        Previous::SameInstance => assert_eq!(state.instance_id, "i-1"),
        Previous::MovedAside { to, .. } => {
            assert_eq!(state, State::fresh("i-1"));
            assert_eq!(std::fs::read(to).unwrap(), bytes, "set aside as it was");
        }
        Previous::OtherInstance(_) => assert_eq!(state, State::fresh("i-1")),
        Previous::None => panic!("the file was there"),
    }
    store.save(&state).unwrap();
    assert_eq!(store.read().unwrap(), Some(state));
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        ".{0,20}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("format".to_owned()),
                    Just("instance-id".to_owned()),
                    Just("last-run".to_owned()),
                    Just("last-applied".to_owned()),
                    Just("scripts".to_owned()),
                    Just("outcome".to_owned()),
                    Just("reboot".to_owned()),
                    ".{0,10}",
                ],
                inner,
                0..8
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        load(&bytes);
    }

    #[test]
    fn json_of_other_shapes(mut v in json_value(), format in prop_oneof![Just(1u64), any::<u64>()]) {
        if let Some(o) = v.as_object_mut() {
            o.insert("format".into(), format.into());
            o.insert("instance-id".into(), "i-1".into());
        }
        load(&serde_json::to_vec(&v).unwrap());
    }
}

#[test]
fn deep_nesting_and_huge_files() {
    load(&[b'['; 100_000]);
    let mut big = br#"{"format":1,"instance-id":"i-1","x":""#.to_vec();
    big.extend(std::iter::repeat_n(b'a', 2 << 20));
    big.extend_from_slice(b"\"}");
    load(&big);
}
