//! One module per subcommand; `run` dispatches.
pub mod bench_train;
pub mod benchmark;
pub mod convert;
pub mod data_check;
pub mod env;
pub mod evaluate;
pub mod extract;
pub mod finetune;
pub mod forward;
pub mod import;
pub mod inspect;
pub mod launch;
pub mod make_groups;
pub mod merge;
pub mod metrics;
pub mod report;
pub mod score;
pub mod test_baseline;
pub mod test_mos;
pub mod tune_mahalanobis;

use crate::cli::{Cli, Command};

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Env(args) => env::run(&args),
        Command::Convert(args) => convert::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Forward(args) => forward::run(&args),
        Command::FinetuneGroup(args) => finetune::run(&args, finetune::Head::Group),
        Command::FinetuneFlat(args) => finetune::run(&args, finetune::Head::Flat),
        Command::TuneMahalanobis(args) => tune_mahalanobis::run(&args),
        Command::TestMos(args) => test_mos::run(&args),
        Command::TestBaseline(args) => test_baseline::run(&args),
        Command::DataCheck(args) => data_check::run(&args),
        Command::DemoData(a) => crate::demo::run(
            &a.src,
            &a.out,
            &crate::demo::DemoOptions {
                train: a.train,
                val: a.val,
                test: a.test,
                ood: a.ood,
            },
        ),
        Command::BenchTrain(args) => bench_train::run(&args),
        Command::Metrics(args) => metrics::run(&args),
        Command::Report(args) => report::run(&args),
        Command::Extract(args) => extract::run(&args),
        Command::Merge(args) => merge::run(&args),
        Command::Import(args) => import::run(&args),
        Command::Launch(args) => launch::run(&args),
        Command::Score(args) => score::run(&args),
        Command::MakeGroups(args) => make_groups::run(&args),
        Command::Benchmark(args) => benchmark::run(&args),
    }
}
