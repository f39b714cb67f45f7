//! The HTTP/1 framing sniffer: its verdicts (a framing conflict, a raw `#`
//! in a request line) on a byte stream do not depend on how the stream is
//! cut into reads.
//!
//! Input: one byte `n` (taken modulo 16), then `n` read lengths, then the
//! stream. The stream is scanned in one read, in the chosen reads (whatever
//! is left is one last read) and one byte per read; all three must agree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::listener::FramingSniffer;

/// Whether any read of the stream, cut as `reads` says, flagged a framing
/// conflict, and whether a request line held a raw `#`.
fn verdict<'a>(reads: impl Iterator<Item = &'a [u8]>) -> (bool, bool) {
    let mut s = FramingSniffer::default();
    let mut conflict = false;
    for r in reads {
        conflict |= s.scan(r);
    }
    (conflict, s.fragment)
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 16).min(rest.len());
    let (lens, stream) = rest.split_at(n);

    let mut cuts = Vec::with_capacity(n + 1);
    let mut left = stream;
    for &l in lens {
        let (read, tail) = left.split_at(usize::from(l).min(left.len()));
        cuts.push(read);
        left = tail;
    }
    cuts.push(left);

    let one = verdict(std::iter::once(stream));
    assert_eq!(
        verdict(cuts.iter().copied()),
        one,
        "reads {:?} of {:?}",
        cuts.iter().map(|r| r.len()).collect::<Vec<_>>(),
        String::from_utf8_lossy(stream)
    );
    assert_eq!(
        verdict(stream.chunks(1)),
        one,
        "one byte per read of {:?}",
        String::from_utf8_lossy(stream)
    );
});
