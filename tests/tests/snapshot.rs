//! The EBS-direct uploader alone (`nixos-ami-publish snapshot`, hidden:
//! the benchmark's entry point) against the fast EBS double
//! (tests/src/ebs.rs): which blocks it sends, that what EBS holds is the
//! disk, and that the double refuses what EBS refuses, so the uploader's
//! success against it means something. The whole `upload` runs against
//! moto in publish.rs.

use nixos_ami_agent_tests::ebs::{BLOCK, Conn, Ebs, EbsDouble, State, write_nixos_like_image};
use nixos_ami_agent_tests::harness::{Output, finish, publish_command, rt};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn snapshot(double: &EbsDouble, dir: &Path, disk: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["snapshot", "--disk", disk.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    finish(
        publish_command(&double.url(), "eu-west-1", dir, &args)
            .spawn()
            .unwrap(),
        Duration::from_secs(120),
    )
}

/// Every block of the disk that the snapshot holds is the disk's; blocks
/// the snapshot does not hold are zeros on the disk.
fn assert_holds(double: &EbsDouble, id: &str, disk: &Path) {
    use std::os::unix::fs::FileExt;
    let s = double.snapshot(id).expect("the snapshot exists");
    assert_eq!(s.state, State::Completed, "{id}");
    let file = std::fs::File::open(disk).unwrap();
    let size = file.metadata().unwrap().len();
    let mut buf = vec![0u8; BLOCK];
    for index in 0..size.div_ceil(BLOCK as u64) {
        let start = index * BLOCK as u64;
        let len = (size - start).min(BLOCK as u64) as usize;
        buf.fill(0);
        file.read_exact_at(&mut buf[..len], start).unwrap();
        let digest: [u8; 32] = Sha256::digest(&buf).into();
        match s.digests.get(&index) {
            Some(d) => assert_eq!(*d, digest, "block {index} differs"),
            None => assert!(buf.iter().all(|b| *b == 0), "block {index} was not sent"),
        }
    }
}

fn json(o: &Output) -> serde_json::Value {
    assert_eq!(o.code, 0, "{o:?}");
    serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("{e}: {o:?}"))
}

#[test]
fn a_sparse_disk_sends_only_its_data_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    let data = write_nixos_like_image(&disk, 256 * MIB, 20, 7).unwrap();
    let double = EbsDouble::start(rt(), Ebs::default());
    let out = json(&snapshot(&double, dir.path(), &disk, &[]));
    let id = out["snapshot_id"].as_str().unwrap();
    assert_eq!(out["blocks"], 512);
    assert_eq!(out["blocks_sent"], data.len() as u64);
    assert!(data.len() < 512, "the image is sparse");
    let s = double.snapshot(id).unwrap();
    assert_eq!(s.digests.keys().copied().collect::<BTreeSet<_>>(), data);
    assert_eq!(
        double.blocks_put.load(std::sync::atomic::Ordering::Relaxed),
        data.len() as u64,
        "each block sent once"
    );
    assert_eq!(s.volume_gib, 1);
    assert_eq!(
        s.tags.get("nixos-ami-publish:complete").map(String::as_str),
        Some("true")
    );
    assert_holds(&double, id, &disk);
}

#[test]
fn all_blocks_and_an_encrypted_snapshot_send_every_block() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    write_nixos_like_image(&disk, 64 * MIB, 10, 3).unwrap();
    // What upload-ami's EBS-direct mode does: every block.
    let double = EbsDouble::start(rt(), Ebs::default());
    let out = json(&snapshot(&double, dir.path(), &disk, &["--all-blocks"]));
    assert_eq!(out["blocks_sent"], 128);
    assert_holds(&double, out["snapshot_id"].as_str().unwrap(), &disk);
    // An account that encrypts by default: EBS would return random data
    // for blocks never written (awslabs/coldsnap#395).
    let encrypted = EbsDouble::start(rt(), Ebs::encrypted());
    let out = json(&snapshot(&encrypted, dir.path(), &disk, &[]));
    assert_eq!(out["blocks_sent"], 128);
    let s = encrypted
        .snapshot(out["snapshot_id"].as_str().unwrap())
        .unwrap();
    assert_eq!(s.digests.len(), 128);
}

#[test]
fn a_partial_last_block_is_padded_with_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    let size = 3 * MIB + 1000;
    let mut bytes = vec![0u8; size as usize];
    bytes[(size - 10) as usize..].fill(0xab);
    bytes[5] = 1;
    std::fs::write(&disk, &bytes).unwrap();
    let double = EbsDouble::start(rt(), Ebs::default());
    let out = json(&snapshot(&double, dir.path(), &disk, &[]));
    assert_eq!(out["blocks"], 7);
    assert_eq!(out["blocks_sent"], 2);
    assert_holds(&double, out["snapshot_id"].as_str().unwrap(), &disk);
}

#[test]
fn an_empty_disk_completes_without_a_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let double = EbsDouble::start(rt(), Ebs::default());
    let out = json(&snapshot(&double, dir.path(), &disk, &[]));
    assert_eq!(out["blocks_sent"], 0);
    assert_holds(&double, out["snapshot_id"].as_str().unwrap(), &disk);
}

#[test]
fn an_unreadable_disk_is_refused_before_anything_is_started() {
    let dir = tempfile::tempdir().unwrap();
    let double = EbsDouble::start(rt(), Ebs::default());
    let o = snapshot(&double, dir.path(), &dir.path().join("missing.raw"), &[]);
    assert_eq!(o.code, 65, "{o:?}");
    assert!(o.stderr.contains("missing.raw"), "{o:?}");
    assert!(double.with(|e| e.snapshots.is_empty()));
}

// The double itself: as strict as EBS, or the tests above prove little.

fn started(c: &mut Conn, gib: u64, token: Option<&str>) -> serde_json::Value {
    let body = match token {
        Some(t) => format!("{{\"VolumeSize\":{gib},\"ClientToken\":\"{t}\"}}"),
        None => format!("{{\"VolumeSize\":{gib}}}"),
    };
    let r = c
        .request("POST", "/snapshots", &[], body.as_bytes())
        .unwrap();
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

fn reason(r: &nixos_ami_agent_tests::ebs::Reply) -> String {
    r.json()["Reason"].as_str().unwrap_or("").to_owned()
}

#[test]
fn the_double_refuses_bad_blocks_as_ebs_does() {
    let double = EbsDouble::start(rt(), Ebs::default());
    let mut c = Conn::connect(&double.url()).unwrap();
    let id = started(&mut c, 1, None)["SnapshotId"]
        .as_str()
        .unwrap()
        .to_owned();
    let block = vec![7u8; BLOCK];
    // A wrong checksum.
    let r = c
        .request(
            "PUT",
            &format!("/snapshots/{id}/blocks/0"),
            &[
                ("x-amz-Data-Length", "524288"),
                (
                    "x-amz-Checksum",
                    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                ),
                ("x-amz-Checksum-Algorithm", "SHA256"),
            ],
            &block,
        )
        .unwrap();
    assert_eq!((r.status, reason(&r).as_str()), (400, "INVALID_CHECKSUM"));
    assert_eq!(r.header("x-amzn-errortype"), Some("ValidationException"));
    // A short block.
    let (r, _) = c.put_block(&id, 0, &block[..4096]).unwrap();
    assert_eq!((r.status, reason(&r).as_str()), (400, "INVALID_BLOCK"));
    // Beyond a 1 GiB volume.
    let (r, _) = c.put_block(&id, 2048, &block).unwrap();
    assert_eq!((r.status, reason(&r).as_str()), (400, "INVALID_BLOCK"));
    // No such snapshot.
    let (r, _) = c.put_block("snap-0000000000000dead", 0, &block).unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(
        r.header("x-amzn-errortype"),
        Some("ResourceNotFoundException")
    );
    // A good one, then a completion that miscounts: the snapshot fails.
    let (r, _) = c.put_block(&id, 2047, &block).unwrap();
    assert_eq!(r.status, 201);
    let r = c
        .request(
            "POST",
            &format!("/snapshots/completion/{id}"),
            &[("x-amz-ChangedBlocksCount", "2")],
            b"",
        )
        .unwrap();
    assert_eq!(r.status, 202);
    assert!(matches!(
        double.snapshot(&id).unwrap().state,
        State::Error(_)
    ));
    // Nothing more is written to it.
    let (r, _) = c.put_block(&id, 0, &block).unwrap();
    assert_eq!(
        (r.status, reason(&r).as_str()),
        (400, "INVALID_SNAPSHOT_STATE")
    );
}

#[test]
fn the_double_checks_the_linear_checksum_and_the_client_token() {
    let double = EbsDouble::start(rt(), Ebs::default());
    let mut c = Conn::connect(&double.url()).unwrap();
    let a = started(&mut c, 2, Some("token-1"));
    assert_eq!(a["Status"], "pending");
    assert_eq!(a["BlockSize"], 524288);
    // The same token: the same snapshot.
    let again = started(&mut c, 2, Some("token-1"));
    assert_eq!(a["SnapshotId"], again["SnapshotId"]);
    let id = a["SnapshotId"].as_str().unwrap().to_owned();
    let (_, d1) = c.put_block(&id, 9, &vec![1u8; BLOCK]).unwrap();
    let (_, d0) = c.put_block(&id, 3, &vec![2u8; BLOCK]).unwrap();
    // Out of index order: refused after the answer.
    let wrong = nixos_ami_agent_tests::ebs::linear_checksum([&d1, &d0]);
    let complete = |c: &mut Conn, id: &str, sum: &str| {
        c.request(
            "POST",
            &format!("/snapshots/completion/{id}"),
            &[
                ("x-amz-ChangedBlocksCount", "2"),
                ("x-amz-Checksum", sum),
                ("x-amz-Checksum-Algorithm", "SHA256"),
                ("x-amz-Checksum-Aggregation-Method", "LINEAR"),
            ],
            b"",
        )
        .unwrap()
    };
    assert_eq!(complete(&mut c, &id, &wrong).status, 202);
    assert!(matches!(
        double.snapshot(&id).unwrap().state,
        State::Error(_)
    ));
    // In index order: completed.
    let b = started(&mut c, 2, Some("token-2"))["SnapshotId"]
        .as_str()
        .unwrap()
        .to_owned();
    c.put_block(&b, 9, &vec![1u8; BLOCK]).unwrap();
    c.put_block(&b, 3, &vec![2u8; BLOCK]).unwrap();
    let right = nixos_ami_agent_tests::ebs::linear_checksum([&d0, &d1]);
    assert_eq!(complete(&mut c, &b, &right).status, 202);
    assert_eq!(double.snapshot(&b).unwrap().state, State::Completed);
    // A volume EBS would not make.
    let r = c
        .request("POST", "/snapshots", &[], b"{\"VolumeSize\":0}")
        .unwrap();
    assert_eq!(
        (r.status, reason(&r).as_str()),
        (400, "INVALID_VOLUME_SIZE")
    );
}

#[test]
fn the_image_generator_is_sparse_deterministic_and_reports_its_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let blocks = write_nixos_like_image(&a, 512 * MIB, 25, 11).unwrap();
    assert_eq!(
        blocks,
        write_nixos_like_image(&b, 512 * MIB, 25, 11).unwrap()
    );
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let bytes = std::fs::read(&a).unwrap();
    let nonzero: BTreeSet<u64> = bytes
        .chunks(BLOCK)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|b| *b != 0))
        .map(|(i, _)| i as u64)
        .collect();
    assert_eq!(nonzero, blocks);
    // Mostly zeros, but far from empty; every block group has metadata.
    assert!((256..256 + 17).contains(&blocks.len()), "{}", blocks.len());
    for group in 0..4u64 {
        assert!(blocks.contains(&(group * 256)));
    }
}
