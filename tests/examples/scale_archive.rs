//! Write an archive with many index runs for `bench/scale.sh`:
//!
//! `scale_archive alternating OUT CLUSTERS`: one drive, every other 64 KiB
//! cluster data (one non-zero 4 KiB block), so CLUSTERS index runs.
//! `scale_archive incremental OUT PARENT CLUSTERS`: an all-zero full PARENT
//! and an incremental OUT on top of it, every cluster a run of its own.
//! `scale_archive huge OUT`: 255 all-zero drives of 128 TiB (a tiny archive).

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: scale_archive alternating OUT CLUSTERS | incremental OUT PARENT CLUSTERS | huge OUT";
    match args.get(1).map(String::as_str) {
        Some("alternating") if args.len() == 4 => {
            let clusters: u64 = args[3].parse().expect(usage);
            let started = std::time::Instant::now();
            vma_tests::scale::alternating(std::path::Path::new(&args[2]), clusters, &mut |c| {
                eprint!("\r[scale] {c} of {clusters} clusters written");
            });
            eprintln!(
                "\r[scale] wrote {} ({clusters} runs) in {:.1} s",
                args[2],
                started.elapsed().as_secs_f64()
            );
        }
        Some("incremental") if args.len() == 5 => {
            let clusters: u64 = args[4].parse().expect(usage);
            let (out, parent) = (
                std::path::Path::new(&args[2]),
                std::path::Path::new(&args[3]),
            );
            vma_tests::scale::zeros(parent, clusters);
            vma_tests::scale::sparse_incremental(out, parent, clusters);
        }
        Some("huge") if args.len() == 3 => {
            vma_tests::scale::huge(std::path::Path::new(&args[2]));
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}
