//! A test guest that misbehaves on request: `loop` spins forever, `alloc` grows memory without
//! end, `panic` traps, `sleep-ms` busy-waits, `print` writes to stdout, anything else is echoed.

use qlayer_sdk::{PluginError, tool::Tool};

struct Hostile;

impl Tool for Hostile {
    fn invoke(input: String) -> Result<String, PluginError> {
        let op = input.trim();
        match op {
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    let mut block = vec![0u8; 1 << 20];
                    block[0] = 1;
                    hoard.push(std::hint::black_box(block));
                }
            }
            "panic" => panic!("hostile guest panics on purpose"),
            "print" => {
                println!("hello from the guest's stdout");
                qlayer_sdk::host::info("hello from host.log");
                Ok("printed".into())
            }
            "env" => Ok(format!("{}", std::env::vars().count())),
            "fs" => Ok(match std::fs::read_dir("/") {
                Ok(_) => "filesystem visible".into(),
                Err(e) => format!("no filesystem: {e}"),
            }),
            "fail-retryable" => Err(PluginError::Unavailable("failing on purpose".into())),
            "fail-fatal" => Err(PluginError::InvalidInput("failing on purpose".into())),
            other if other.starts_with("sleep-ms ") => {
                let ms: u64 = other[9..].parse().map_err(|_| PluginError::InvalidInput("bad number".into()))?;
                let start = std::time::Instant::now();
                while start.elapsed().as_millis() < ms as u128 {
                    std::hint::spin_loop();
                }
                Ok("slept".into())
            }
            other => Ok(other.to_string()),
        }
    }
}

qlayer_sdk::export_tool!(Hostile);
