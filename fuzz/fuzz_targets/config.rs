//! Configuration files: parsing and validating arbitrary text never panics, and a file that
//! parses and validates prints (as `config check` does) to TOML that parses and validates to
//! the same printed form.
#![no_main]

use gateway::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = toml::from_str::<Config>(text) else {
        return;
    };
    if cfg.validate().is_err() {
        return;
    }
    let printed = toml::to_string_pretty(&cfg).expect("a valid config prints");
    let again: Config = toml::from_str(&printed).expect("the printed config parses");
    again.validate().expect("the printed config validates");
    assert_eq!(toml::to_string_pretty(&again).expect("prints"), printed);
});
