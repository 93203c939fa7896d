//! `secure::wipe_pool` zeroes live values too. In a test binary of its own: it would zero the
//! keys of tests running alongside it in one process.

use pg_envelope_core::secure::{wipe_pool, SecureBox};

#[test]
fn wiping_the_pool_zeroes_every_value_live_or_not() {
    let small = SecureBox::new([0x5Au8; 32]);
    let large = SecureBox::new([0xA5u8; 8192]); // over the largest class: a mapping of its own
    let freed = SecureBox::new([0x3Cu8; 100]);
    drop(freed);
    assert!(small.iter().all(|&b| b == 0x5A) && large.iter().all(|&b| b == 0xA5), "control");
    wipe_pool();
    assert!(small.iter().all(|&b| b == 0), "a live small value survived");
    assert!(large.iter().all(|&b| b == 0), "a live large value survived");
}
