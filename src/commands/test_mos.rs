//! `mos test-mos`: the MOS score of a group-softmax model (the original's test_mos.py).
use anyhow::{Context, Result};

use super::evaluate::{self, EvalJob, HeadCheck};
use crate::cli::TestMosArgs;
use crate::groupconfig::read_group_config;
use crate::ood::GroupSlices;
use crate::pipeline::score::Method;

pub fn run(args: &TestMosArgs) -> Result<()> {
    let cfg = read_group_config(&args.group_config).context("--group-config")?;
    let slices = GroupSlices::new(&cfg.classes_per_group)
        .with_context(|| format!("--group-config {}", args.group_config.display()))?;
    let groups = slices.num_groups();
    let settings = serde_json::json!({
        "group_config": args.group_config,
        "classes_per_group": cfg.classes_per_group,
    });
    evaluate::run(EvalJob {
        command: "test-mos",
        data: &args.data,
        run: &args.run,
        model: args.model.model,
        model_path: &args.model_path,
        device: &args.device,
        output: &args.output,
        methods: vec![Method::Mos(slices)],
        head: HeadCheck::Group {
            groups,
            config: args.group_config.clone(),
        },
        settings,
    })
}
