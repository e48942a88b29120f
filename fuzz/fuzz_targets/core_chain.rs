//! spright-core chain YAML: parse and validate, then route every hop of every chain
//! through the routing table the gateway hands to functions.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spright_core::chain::ChainFile;
use spright_fuzz::text;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = ChainFile::parse(&text(data)) else {
        return;
    };
    let table = file.routing_table();
    for f in &file.functions {
        let id = table.id(&f.name).expect("every function has an id");
        assert_eq!(table.name(id), Some(f.name.as_str()));
    }
    for (c, chain) in file.chains.iter().enumerate() {
        let c = u16::try_from(c).expect("validated chain count");
        let mut hop = 0u16;
        let mut steps = 1;
        while let Some((next, _id)) = table.next(c, hop) {
            assert_eq!(next, hop + 1);
            hop = next;
            steps += 1;
        }
        assert_eq!(steps, chain.steps.len(), "routing table lost steps");
    }
    let _ = table.next(u16::MAX, u16::MAX);
});
