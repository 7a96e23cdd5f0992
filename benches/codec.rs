//! The L2 codec: encoding and decoding an entry (the 28-byte envelope around the
//! payload, CRC-32 included), with gzip and without.
//!
//! ```text
//! cargo bench --bench codec
//! ```
//!
//! Payloads are flag-configuration-like JSON of 200 B, 2 KiB and 64 KiB. `plain`
//! never compresses; `gzip` compresses every payload (the default compresses above
//! 1 KiB).

#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flagcache::{
    codec::{Codec, EnvelopeCodec},
    store::Entry,
    Version,
};

/// Rules of a flag, as a control plane would serve them: repetitive, like real JSON.
fn payload(len: usize) -> Bytes {
    let mut rng = fastrand::Rng::with_seed(11);
    let mut s = String::from("{\"rules\":[");
    while s.len() < len {
        s.push_str(&format!(
            "{{\"segment\":\"seg-{}\",\"variant\":\"{}\",\"percent\":{}}},",
            rng.u32(..10_000),
            ["on", "off", "control", "treatment"][rng.usize(..4)],
            rng.u8(..100)
        ));
    }
    s.truncate(len);
    Bytes::from(s)
}

fn bench(c: &mut Criterion) {
    let codecs = [
        (
            "plain",
            Codec::from(EnvelopeCodec::new().compress_above(usize::MAX)),
        ),
        ("gzip", Codec::from(EnvelopeCodec::new().compress_above(0))),
    ];
    for (label, len) in [("200B", 200), ("2KiB", 2048), ("64KiB", 64 << 10)] {
        let entry = Entry::new(Version::new(42), payload(len));
        let mut group = c.benchmark_group(format!("codec/{label}"));
        group.throughput(Throughput::Bytes(len as u64));
        for (name, codec) in &codecs {
            let encoded = codec.encode_entry(&entry).expect("encodes");
            group.bench_function(BenchmarkId::new("encode", name), |b| {
                b.iter(|| black_box(codec.encode_entry(black_box(&entry)).expect("encodes")))
            });
            group.bench_function(BenchmarkId::new("decode", name), |b| {
                b.iter(|| {
                    black_box(
                        codec
                            .decode_entry(black_box(encoded.clone()))
                            .expect("decodes"),
                    )
                })
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
