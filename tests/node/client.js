// Calls cohortsim from Node with nothing but the .proto (issue #6): GetIndexInfo, then
// SearchSimilar with an embedding given on the command line. Prints one JSON object.
//
//   node client.js HOST:PORT PROTO_ROOT '[0.1, 0.2, ...]' K
'use strict';
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [target, protoRoot, vectorJson, kText] = process.argv.slice(2);
const definition = protoLoader.loadSync('cohortsim/v1/cohortsim.proto', {
  includeDirs: [protoRoot],
  keepCase: true, // field names as in the .proto (lower_snake_case)
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const pkg = grpc.loadPackageDefinition(definition);
const client = new pkg.cohortsim.v1.PatientSimilarityService(target, grpc.credentials.createInsecure());
const deadline = () => new Date(Date.now() + 20000);

function call(method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: deadline() }, (err, resp) => (err ? reject(err) : resolve(resp)));
  });
}

(async () => {
  try {
    const info = await call('GetIndexInfo', {});
    const search = await call('SearchSimilar', {
      embedding: { values: JSON.parse(vectorJson) },
      k: Number(kText),
    });
    let badCode = null;
    let badReason = null;
    try {
      await call('SearchSimilar', { embedding: { values: [1, 2, 3] }, k: 3 });
    } catch (err) {
      badCode = err.code;
      badReason = (err.metadata && err.metadata.get('grpc-status-details-bin').length) ? 'present' : null;
    }
    console.log(JSON.stringify({
      num_studies: info.num_studies,
      dimension: info.dimension,
      index_version: info.index_version,
      neighbors: search.neighbors.map((n) => ({ study_uid: n.study_uid, similarity: n.similarity })),
      bad_code: badCode,
      bad_details: badReason,
    }));
    client.close();
  } catch (err) {
    console.error(`node client failed: ${err.code} ${err.details || err.message}`);
    process.exit(1);
  }
})();
