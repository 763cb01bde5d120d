//! `mos test-baseline`: MSP, ODIN, Energy and KL matching on a flat-softmax model
//! (the original's test_baselines.py); several at once share one forward pass.
use anyhow::{bail, Result};

use super::evaluate::{self, EvalJob, HeadCheck};
use crate::cli::TestBaselineArgs;
use crate::ood::Score;
use crate::pipeline::score::mahalanobis_params::read_params_for;
use crate::pipeline::score::Method;

pub fn run(args: &TestBaselineArgs) -> Result<()> {
    let b = &args.baseline;
    let (temperature_odin, epsilon_odin, temperature_energy) = (
        b.temperature_odin(),
        b.epsilon_odin(),
        b.temperature_energy(),
    );
    let mut methods = Vec::new();
    for score in &args.score {
        let method = match score {
            Score::Msp => Method::Msp,
            Score::Odin => Method::Odin {
                temperature: temperature_odin,
                epsilon: epsilon_odin,
            },
            Score::Energy => Method::Energy {
                temperature: temperature_energy,
            },
            Score::KlDiv => Method::KlDiv,
            Score::Mahalanobis => {
                args.model
                    .model
                    .require_feature_layers("--score Mahalanobis")
                    .map_err(anyhow::Error::msg)?;
                let Some(path) = &b.mahalanobis_param_path else {
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
    if epsilon_odin < 0.0 || !epsilon_odin.is_finite() {
        bail!(
            "--epsilon-odin {}: must be a non-negative number",
            epsilon_odin
        );
    }
    for (flag, t) in [
        ("--temperature-odin", temperature_odin),
        ("--temperature-energy", temperature_energy),
    ] {
        if !(t > 0.0 && t.is_finite()) {
            bail!("{flag} {t}: must be a positive number");
        }
    }
    let settings = serde_json::json!({
        "score": args.score.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        "temperature_odin": temperature_odin,
        "epsilon_odin": epsilon_odin,
        "temperature_energy": temperature_energy,
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
