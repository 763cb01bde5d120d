//! `mos test-baseline`: MSP, ODIN, Energy and KL matching on a flat-softmax model
//! (the original's test_baselines.py); several at once share one forward pass.
use anyhow::{bail, Result};

use super::evaluate::{self, EvalJob, HeadCheck};
use crate::cli::TestBaselineArgs;
use crate::eval::Method;
use crate::ood::Score;
use crate::pipeline::mahalanobis::read_params_for;

pub fn run(args: &TestBaselineArgs) -> Result<()> {
    let mut methods = Vec::new();
    for score in &args.score {
        let method = match score {
            Score::Msp => Method::Msp,
            Score::Odin => Method::Odin {
                temperature: args.temperature_odin,
                epsilon: args.epsilon_odin,
            },
            Score::Energy => Method::Energy {
                temperature: args.temperature_energy,
            },
            Score::KlDiv => Method::KlDiv,
            Score::Mahalanobis => {
                let Some(path) = &args.mahalanobis_param_path else {
                    bail!("--score Mahalanobis needs --mahalanobis-param-path (the output of tune-mahalanobis)");
                };
                let device = args.device.device.resolve()?;
                let params = read_params_for(path, device, Some(args.model.model))?;
                Method::Mahalanobis(std::rc::Rc::new(params))
            }
        };
        if methods.iter().any(|m: &Method| m.name() == method.name()) {
            bail!("--score lists {} twice", method.name());
        }
        methods.push(method);
    }
    if args.epsilon_odin < 0.0 || !args.epsilon_odin.is_finite() {
        bail!(
            "--epsilon-odin {}: must be a non-negative number",
            args.epsilon_odin
        );
    }
    for (flag, t) in [
        ("--temperature-odin", args.temperature_odin),
        ("--temperature-energy", args.temperature_energy),
    ] {
        if !(t > 0.0 && t.is_finite()) {
            bail!("{flag} {t}: must be a positive number");
        }
    }
    let settings = serde_json::json!({
        "score": args.score.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        "temperature_odin": args.temperature_odin,
        "epsilon_odin": args.epsilon_odin,
        "temperature_energy": args.temperature_energy,
    });
    evaluate::run(EvalJob {
        command: "test-baseline",
        data: &args.data,
        run: &args.run,
        model: args.model.model,
        model_path: &args.model_path,
        device: &args.device,
        output: &args.output,
        methods,
        head: HeadCheck::Flat,
        settings,
    })
}
