#!/usr/bin/env node
// node seg_check.mjs SEG.dcm IMAGE.dcm [IMAGE.dcm ...]
//
// Loads a DICOM SEG through Cornerstone3D's SEG adapter (@cornerstonejs/adapters,
// the version OHIF 3.13 pins) against its source images, with OHIF core's
// metadata store and provider behind Cornerstone's metaData (ohif_env.mjs).
// OHIF 3.13's SEG extension calls Segmentation.createFromDicomSegImageId with
// per-frame imageIds that Cornerstone's DICOM image loader decodes (browser
// workers); this calls the same module's Part 10 buffer entry,
// createFromDICOMSegBuffer, which parses the file with dcmjs and then runs the
// same labelmap builder (segment metadata, orientation check, frame-to-image
// matching, pixel insertion). Prints one JSON object on stdout: the segments,
// which source image each labelmap belongs to, and the pixels per segment.
import fs from 'node:fs';

import { captureConsole, createApp, csAdapters, loadOhif, readDicomFiles, storeInstances, csCore } from './ohif_env.mjs';

const warnings = captureConsole();

function pixelsOf(image) {
  return image.voxelManager?.getScalarData?.() ?? image.getPixelData?.() ?? [];
}

async function main() {
  const [segPath, ...imagePaths] = process.argv.slice(2);
  if (!segPath || imagePaths.length === 0) {
    process.stderr.write('usage: node seg_check.mjs SEG.dcm IMAGE.dcm [IMAGE.dcm ...]\n');
    process.exit(2);
  }
  const { ohifCore, srExtension } = loadOhif();
  const app = createApp(ohifCore, srExtension);
  const images = readDicomFiles(imagePaths);
  storeInstances(ohifCore, images);
  const referencedImageIds = images.map(image => image.imageId);

  const bytes = fs.readFileSync(segPath);
  const arrayBuffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  const result = { threw: false, error: null, segments: [], labelmaps: [], overlappingSegments: null, warnings };
  try {
    const loaded = await csAdapters.adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer(
      referencedImageIds,
      arrayBuffer,
      { metadataProvider: csCore.metaData, tolerance: 0.001 }
    );
    result.overlappingSegments = loaded.overlappingSegments ?? null;
    result.segments = loaded.segMetadata.data
      .map((segment, index) => ({ index, segment }))
      .filter(({ segment }) => segment)
      .map(({ index, segment }) => ({
        segmentNumber: segment.SegmentNumber ?? index,
        label: segment.SegmentLabel ?? null,
        algorithmType: segment.SegmentAlgorithmType ?? null,
        category: segment.SegmentedPropertyCategoryCodeSequence?.CodeMeaning ?? null,
        type: segment.SegmentedPropertyTypeCodeSequence?.CodeMeaning ?? null,
      }));
    for (const [layer, layerImages] of (loaded.labelMapImages ?? []).entries()) {
      for (const [imageIndex, image] of layerImages.entries()) {
        const counts = {};
        for (const value of pixelsOf(image)) {
          if (value) counts[value] = (counts[value] ?? 0) + 1;
        }
        const referencedImageId = image.referencedImageId ?? referencedImageIds[imageIndex];
        result.labelmaps.push({
          layer,
          referencedSOPInstanceUID: app.metadataProvider.getUIDsFromImageID(referencedImageId)?.SOPInstanceUID ?? null,
          rows: image.rows,
          columns: image.columns,
          pixelsPerSegment: counts,
        });
      }
    }
  } catch (error) {
    result.threw = true;
    result.error = { name: error?.name ?? 'Error', message: String(error?.message ?? error) };
    process.stderr.write(`${error?.stack ?? error}\n`);
  }
  process.stdout.write(`${JSON.stringify(result, null, 1)}\n`);
}

main().catch(error => {
  process.stderr.write(`${error?.stack ?? error}\n`);
  process.exit(1);
});
